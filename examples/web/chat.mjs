// Chat templates in JavaScript: a bundle's `chat_template` rendered to the text edgeseq (Python) and
// transformers' apply_chat_template give, so a Node or browser app feeds a chat model what it was
// trained on. Runs in Node and in a browser (no Node APIs).
//
//   const t = chatTemplate(manifest);            // null: no template (plain continuation)
//   const text = t.render(messages, { addGenerationPrompt: true, enable_thinking: false });
//   t.stop                                        // end-of-turn markers the template writes (stop strings)
//
// Format 2 (manifest.chat_template = {"jinja", "special_tokens", "source"}): the checkpoint's own Jinja
// template, rendered with @huggingface/jinja (the Hugging Face port; trim_blocks and lstrip_blocks on, as
// transformers sets them), given what transformers gives it: messages, tools and documents (null unless
// passed), add_generation_prompt, the special tokens' texts (bos_token, eos_token, ...), raise_exception,
// strftime_now, and the model's own variables (enable_thinking, ...). A template's raise_exception(...)
// becomes a ChatTemplateError with its message. Format 1 (a plain-string template, RWKV World style):
// {"system", "turn", "stop"} with {system}, {user} and {assistant} slots.
import { Interpreter, Template } from "../node_modules/@huggingface/jinja/dist/index.js";

// end-of-turn markers: a template that writes one ends a reply there (edgeseq/chat_template.py's list)
export const END_MARKERS = ["<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|endoftext|>",
  "<|end_of_text|>", "<|return|>", "<|end_of_role|>"];

export class ChatTemplateError extends Error {}

// @huggingface/jinja (0.5.11, 0.5.13) strips whitespace in s.strip(chars), s.lstrip(chars) and
// s.rstrip(chars) whatever chars is; Python strips those characters only. Qwen3's and Qwen3.5's templates
// call .lstrip('\n') on a reply after its </think> ("</think> b" keeps its space in Python). So a call of
// one of the three on a string with one string argument is done here, as Python does it.
const STRIPS = { strip: [true, true], lstrip: [true, false], rstrip: [false, true] };
if (!Interpreter.prototype.edgeseqStrips) {
  const call = Interpreter.prototype.evaluateCallExpression;
  Interpreter.prototype.evaluateCallExpression = function (expr, environment) {
    const c = expr.callee;
    const sides = c && c.type === "MemberExpression" && !c.computed && STRIPS[c.property.value];
    if (sides && expr.args.length === 1) {
      const object = this.evaluate(c.object, environment);
      const chars = this.evaluate(expr.args[0], environment);
      if (object.type === "StringValue" && chars.type === "StringValue") {
        return new object.constructor(pyStrip(object.value, chars.value, ...sides));
      }
    }
    return call.call(this, expr, environment);
  };
  Interpreter.prototype.edgeseqStrips = true;
}

function pyStrip(s, chars, left, right) {
  let a = 0;
  let b = s.length;
  while (left && a < b && chars.includes(s[a])) a++;
  while (right && b > a && chars.includes(s[b - 1])) b--;
  return s.slice(a, b);
}

export function chatTemplate(manifest) {
  const spec = manifest.chat_template;
  if (!spec) return null;
  if (typeof spec === "string") { // a name kept by an older GGUF conversion, or Jinja text
    if (spec === "rwkv-world") return plainTemplate(RWKV_WORLD);
    return jinjaTemplate({ jinja: spec, special_tokens: {} });
  }
  return "jinja" in spec ? jinjaTemplate(spec) : plainTemplate(spec);
}

const RWKV_WORLD = { system: "System: {system}\n\n", turn: "User: {user}\n\nAssistant:{assistant}\n\n", stop: ["\n\n"] };

function jinjaTemplate(spec) {
  let compiled;
  try {
    compiled = new Template(spec.jinja);
  } catch (e) {
    throw new ChatTemplateError(`chat template: ${e.message}`);
  }
  return {
    kind: "jinja",
    stop: END_MARKERS.filter((m) => spec.jinja.includes(m)),
    render(messages, { addGenerationPrompt = true, tools = null, documents = null, ...vars } = {}) {
      try {
        return compiled.render({ ...vars, messages, tools, documents, add_generation_prompt: addGenerationPrompt,
          ...(spec.special_tokens || {}) });
      } catch (e) {
        throw new ChatTemplateError(`chat template: ${e.message}`);
      }
    },
  };
}

function plainTemplate(t) {
  const [before, after] = splitOnce(t.turn, "{assistant}");
  return {
    kind: "plain",
    stop: [...(t.stop || [])],
    render(messages) { // the user's part ends with the assistant's header either way
      return messages.map((m) => {
        if (m.role === "system") return (t.system ?? "{system}\n\n").replaceAll("{system}", m.content);
        if (m.role === "user") return before.replaceAll("{user}", m.content);
        return m.content + after;
      }).join("");
    },
  };
}

function splitOnce(s, sep) {
  const i = s.indexOf(sep);
  return i < 0 ? [s, ""] : [s.slice(0, i), s.slice(i + sep.length)];
}
