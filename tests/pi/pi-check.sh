#!/usr/bin/env bash
# make pi-check: edgeseq on 64-bit Arm Linux (Debian 12 arm64, Python 3.11), emulated on this x86-64 machine
# with qemu's user mode. What it runs, and why each piece is built as it is: docs/devices.md, section
# "Raspberry Pi, executed: aarch64 under emulation".
#
#   bash tests/pi/pi-check.sh [PART ...]     PART: demo tests logits memory (default: all four)
#
# Needs root (apt-get, mmdebstrap, chroot, mounts in a private mount namespace), the x86 venv with the test
# extras (.venv, `make test`'s; it builds the tiny random checkpoints with torch), and the package
# registries (Debian's mirror as this machine's apt is configured, PyPI for the aarch64 wheels).
# Environment: PI_DIR (default /var/tmp/edgeseq-pi: root file system, pip cache, work files; never in git),
# PI_CPUS (qemu CPU models, default "cortex-a76 cortex-a72": Raspberry Pi 5 and Pi 4; the first one runs
# the demo, the tests and the memory measurements, every one runs the logits).
# Exit status: 0 when every part passed; 1 otherwise (the summary at the end names what failed).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PI_DIR=${PI_DIR:-/var/tmp/edgeseq-pi}
PI_CPUS=${PI_CPUS:-cortex-a76 cortex-a72}
read -r -a CPUS <<<"$PI_CPUS"
CPU0=${CPUS[0]}
R=$PI_DIR/rootfs
WORK=$PI_DIR/work
HOSTPY=$ROOT/.venv/bin/python
PARTS=("$@")
[ ${#PARTS[@]} -eq 0 ] && PARTS=(demo tests logits memory)
NICE="nice -n 10"
T_START=$(date +%s)
declare -a SUMMARY=()
FAILED=0

log() { printf '[pi-check %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
want() { local p; for p in "${PARTS[@]}"; do [ "$p" = "$1" ] && return 0; done; return 1; }
record() {  # record PART STATUS DETAIL
  SUMMARY+=("$(printf '%-8s %-5s %s' "$1" "$2" "$3")")
  [ "$2" = ok ] || FAILED=1
}

# The files of the test suite that exercise the runtime, run inside: sessions, state files, sampling and
# streaming (test_session), GGUF reading and running (test_gguf_reader, test_gguf_runtime, test_rwkvcpp_reader),
# mobile .ort bundles (test_mobile), tokenizers (test_bos, test_sentencepiece, test_rwkv_world), the attention
# ring kernel (test_attention_ring). Left out for time (about 17 minutes more under emulation, measured):
# test_quant_onnx, test_quant_gguf and test_rwkv5 (exporters and one family; the logits part covers families).
TEST_FILES=(tests/test_session.py tests/test_mobile.py tests/test_gguf_runtime.py tests/test_gguf_reader.py
            tests/test_rwkvcpp_reader.py tests/test_attention_ring.py tests/test_bos.py tests/test_sentencepiece.py
            tests/test_rwkv_world.py)
# Tests that cannot run inside, and why (pytest --deselect, on both sides):
# - their checkpoints come from torch code the replay (tests/pi/pi_refs.py) does not cover: a checkpoint
#   edited with torch inside the test (test_session's UTF-8 model), torch.save of a random RWKV state dict
#   (test_mobile's rwkv6 and state-tuned bundle, test_rwkv_world's bundle, test_rwkvcpp_reader's .pth twins
#   of rwkv.cpp files), or the builders of test_zamba.py, test_zamba2.py and test_recurrent_gemma.py,
#   modules that import torch at the top;
# - they compare with transformers' own code (RoPE; the BPE SentencePiece conversion check).
DESELECT=(tests/test_session.py::test_streamed_text_never_splits_a_character
          tests/test_rwkv_world.py::test_world_model_bundles_the_vocabulary_and_chat_template
          tests/test_rwkv_world.py::test_world_chat_turn_ends_at_end_of_turn_token
          tests/test_attention_ring.py::test_rope_matches_transformers
          tests/test_mobile.py::test_state_tuned_bundle_ships_its_initial_state
          tests/test_rwkvcpp_reader.py::test_rwkv6_file_written_the_rwkv_cpp_way_matches_its_pth
          tests/test_rwkvcpp_reader.py::test_rwkv5_0_and_5_1_files_written_the_rwkv_cpp_way_read_as_their_pth
          "tests/test_sentencepiece.py::test_trained_models[bpe-True-False]"
          "tests/test_sentencepiece.py::test_trained_models[bpe-True-True]")
for fam in rwkv6 zamba zamba2 recurrent_gemma; do
  for fn in test_ort_graph_matches_the_onnx_graph test_ops_config_lists_the_graphs_standard_ops \
            test_mobile_bundle_matches_outside_reference; do DESELECT+=("tests/test_mobile.py::$fn[$fam]"); done
done
for fam in zamba zamba2 recurrent_gemma; do
  DESELECT+=("tests/test_gguf_runtime.py::test_generic_architecture_for_hybrid_families[$fam]")
done
DESELECT_ARGS=$(printf ' --deselect=%q' "${DESELECT[@]}")

for part in "${PARTS[@]}"; do
  case $part in demo|tests|logits|memory) ;; *) die "unknown part '$part' (demo tests logits memory)";; esac
done
[ "$(id -u)" = 0 ] || die "needs root (mmdebstrap, chroot, mount namespaces)"
[ "$(uname -m)" = x86_64 ] || die "made for an x86-64 host (uname -m: $(uname -m))"
[ -x "$HOSTPY" ] && "$HOSTPY" -c 'import torch, transformers' 2>/dev/null \
  || die "$HOSTPY with torch and transformers is needed for the x86 side: run 'make test' (or its .venv/.test stamp) first"

# -- 1. host tools: qemu user mode, binfmt_misc, mmdebstrap ------------------------------------------------
need=()
command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v update-binfmts >/dev/null || need+=(binfmt-support)
command -v arch-test >/dev/null || need+=(arch-test)
if [ ${#need[@]} -gt 0 ]; then
  log "apt-get install ${need[*]}"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}") >&2 \
    || die "could not install ${need[*]}"
fi
if [ ! -e /proc/sys/fs/binfmt_misc/status ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null \
    || die "binfmt_misc is not mounted and cannot be (a container without the privilege?): mmdebstrap's arm64 " \
           "maintainer scripts and every program the tests start need the kernel to hand aarch64 binaries to qemu"
fi
if ! grep -qs '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64; then
  update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || update-binfmts --import qemu-aarch64 >/dev/null 2>&1 || true
fi
grep -qs '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64 \
  || die "qemu-aarch64 is not registered with binfmt_misc (update-binfmts --enable qemu-aarch64 failed)"
# the interpreter, inside the root file system too: needed where binfmt lacks the F (fix binary) flag
INTERP=$(awk '/^interpreter/ {print $2}' /proc/sys/fs/binfmt_misc/qemu-aarch64)

# -- 2. the Debian arm64 root file system ------------------------------------------------------------------
mkdir -p "$PI_DIR" "$WORK"
if [ ! -f "$R/.pi-ready" ]; then
  # the mirror this machine's apt is configured with (nothing written into the repository)
  MIRROR=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(ORIGIN)' 'Created-By: Packages' 2>/dev/null \
           | awk '$2 == "bookworm" && $3 == "Debian" {print $1; exit}')
  [ -n "$MIRROR" ] || die "no Debian bookworm mirror in this machine's apt sources (apt-get indextargets)"
  log "mmdebstrap: Debian 12 arm64 (python3, python3-venv, make, ca-certificates) from $MIRROR"
  rm -rf "$R.new"
  $NICE mmdebstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,ca-certificates,make \
    bookworm "$R.new" "deb $MIRROR bookworm main" "deb $MIRROR bookworm-updates main" >"$PI_DIR/mmdebstrap.log" 2>&1 \
    || die "mmdebstrap failed: see $PI_DIR/mmdebstrap.log"
  touch "$R.new/.pi-ready"
  rm -rf "$R" && mv "$R.new" "$R"
fi
mkdir -p "$R$(dirname "$INTERP")" "$R/pi/work" "$R/src/edgeseq" "$R/src/shared"
cp -f "$INTERP" "$R$INTERP"
# this machine's trust store (TLS to PyPI may pass a proxy whose CA only the host trusts)
cp -f /etc/ssl/certs/ca-certificates.crt "$R/etc/pi-host-ca.crt"
cp -f /etc/resolv.conf "$R/etc/resolv.conf" 2>/dev/null || true

# /proc/cpuinfo as the Pi shows it: under qemu-user the guest reads the host's x86 /proc/cpuinfo, and
# onnxruntime's aarch64 build crashes (SIGSEGV) importing with that; the CPU features qemu emulates for
# the model come from the auxiliary vector, these files only have to agree with them
cpuinfo() {  # cpuinfo MODEL -> path of a 4-core /proc/cpuinfo for that model
  local f="$PI_DIR/cpuinfo-$1" feat part var rev
  case $1 in
    cortex-a72) feat="fp asimd evtstrm crc32 cpuid"; part=0xd08; var=0x0; rev=3;;                  # Pi 4 (BCM2711)
    cortex-a76) feat="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp"
                part=0xd0b; var=0x4; rev=1;;                                                       # Pi 5 (BCM2712)
    *) die "no /proc/cpuinfo template for qemu CPU '$1' (cortex-a72, cortex-a76)";;
  esac
  : >"$f"
  for i in 0 1 2 3; do
    printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: %s\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: %s\nCPU part\t: %s\nCPU revision\t: %s\n\n' \
      "$i" "$feat" "$var" "$part" "$rev" >>"$f"
  done
  echo "$f"
}

# guest CPU COMMAND...: run COMMAND with bash inside the arm64 system, as root, in a private mount namespace
# (its mounts vanish with it), WORK at /pi/work, the repository copy at /src/edgeseq
guest() {
  local cpu=$1; shift
  local ci; ci=$(cpuinfo "$cpu") || exit 1
  $NICE unshare --mount --propagation private bash -c '
    R=$1 WORK=$2 CI=$3 CPU=$4; shift 4
    mount -t proc proc "$R/proc" && mount --rbind /dev "$R/dev" && mount -t sysfs sys "$R/sys" \
      && mount --bind "$CI" "$R/proc/cpuinfo" && mount --bind "$WORK" "$R/pi/work" || exit 97
    exec chroot "$R" /usr/bin/env -i HOME=/root PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 TERM=dumb \
      PIP_CERT=/etc/pi-host-ca.crt PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore QEMU_CPU="$CPU" \
      PI_REFS=/pi/work/refs /bin/bash -c "cd /src/edgeseq && $*"
  ' pi-guest "$R" "$WORK" "$ci" "$cpu" "$@"
}

# -- 3. the repository into the guest: the working tree as git sees it (tracked and untracked, not ignored),
# and ../shared (the fixtures); the guest's .venv and demo-model are kept between runs
log "copying the working tree into $R/src/edgeseq"
find "$R/src/edgeseq" -mindepth 1 -maxdepth 1 ! -name .venv ! -name demo-model ! -name '*.egg-info' -exec rm -rf {} +
(cd "$ROOT" && git ls-files -co --exclude-standard -z | tar --null -T - -cf -) | tar -xf - -C "$R/src/edgeseq" \
  || die "copying the working tree failed"
rm -rf "$R/src/shared" && mkdir -p "$R/src/shared" && tar -C "$ROOT/../shared" -cf - . | tar -xf - -C "$R/src/shared"
# the guest's conftest: the real one as conftest_x86.py, run by pi_conftest.py without torch (tests/pi/pi_refs.py)
mv "$R/src/edgeseq/tests/conftest.py" "$R/src/edgeseq/tests/conftest_x86.py"
cp "$ROOT/tests/pi/pi_conftest.py" "$R/src/edgeseq/tests/conftest.py"

GV=/src/edgeseq/.venv/bin/python
part_time() { echo "$(( $(date +%s) - $1 )) s"; }

# -- 4. make demo inside, and a chat turn -----------------------------------------------------------------
# always: it also installs edgeseq into the guest's .venv (the Makefile's own pinned install, constraints.txt)
t=$(date +%s)
log "guest ($CPU0): make demo (creates .venv from constraints.txt on first run)"
if guest "$CPU0" 'make demo' >"$WORK/demo.log" 2>&1; then
  if want demo; then
    ok=1
    # the install: no torch anywhere, and every installed package at constraints.txt's version
    guest "$CPU0" "$GV -m pip freeze --all --exclude-editable >/pi/work/guest-freeze.txt; $GV -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec(\"torch\") is not None)'" \
      || { ok=0; log "torch is installed in the guest, or pip freeze failed"; }
    "$HOSTPY" "$ROOT/tests/pi/pi_host.py" pins "$WORK" >&2 || ok=0
    # a chat turn: one line in, a reply out (plain continuation: the demo has no chat template)
    if guest "$CPU0" 'printf "And God said\n" | .venv/bin/edgeseq chat demo-model/rwkv7-int8 -n 60 --seed 0' \
        >"$WORK/chat.log" 2>&1 && [ "$(wc -c <"$WORK/chat.log")" -gt 60 ]; then :; else ok=0; log "chat turn failed: $WORK/chat.log"; fi
    [ $ok = 1 ] && record demo ok "make demo, chat turn, pinned install without torch ($(part_time "$t"))" \
                || record demo FAIL "see $WORK/demo.log, $WORK/chat.log"
  fi
else
  record demo FAIL "make demo failed in the guest: $WORK/demo.log"
  log "$(tail -20 "$WORK/demo.log")"
fi

# -- 5. the runtime's tests, inside -----------------------------------------------------------------------
if want tests; then
  t=$(date +%s)
  ok=1
  refs_key=$( (cat "$ROOT/tests/conftest.py" "$ROOT"/tests/pi/pi_re*.py "${TEST_FILES[@]/#/$ROOT/}"; echo "$DESELECT_ARGS") \
             | sha256sum | cut -c1-16)
  if [ "$(cat "$WORK/refs/key" 2>/dev/null)" != "$refs_key" ]; then
    log "x86: recording the torch-backed references (pytest on ${#TEST_FILES[@]} files with tests/pi/pi_record.py)"
    rm -rf "$WORK/refs" && mkdir -p "$WORK/refs"
    (cd "$ROOT" && PI_REFS="$WORK/refs" PYTHONPATH="$ROOT/tests/pi" $NICE "$HOSTPY" -P -m pytest -q -p no:cacheprovider \
       -p pi_record --junitxml="$WORK/refs/x86.xml" "${TEST_FILES[@]}" "${DESELECT[@]/#/--deselect=}") >"$WORK/tests-x86.log" 2>&1
    [ -f "$WORK/refs/x86.xml" ] && echo "$refs_key" >"$WORK/refs/key" || { ok=0; log "x86 recording failed: $WORK/tests-x86.log"; }
  fi
  log "guest ($CPU0): pytest on ${#TEST_FILES[@]} files (installs pytest, sentencepiece, rwkv from constraints.txt)"
  guest "$CPU0" "$GV -m pip install -q -c constraints.txt pytest sentencepiece rwkv jsonschema && \
      $GV -P -m pytest -q -p no:cacheprovider --durations=15 --junitxml=/pi/work/tests-arm.xml ${TEST_FILES[*]}$DESELECT_ARGS" \
      >"$WORK/tests-arm.log" 2>&1
  "$HOSTPY" "$ROOT/tests/pi/pi_host.py" tests "$WORK" >"$WORK/tests-compare.txt" 2>&1 || ok=0
  cat "$WORK/tests-compare.txt" >&2
  [ $ok = 1 ] && record tests ok "$(tail -1 "$WORK/tests-compare.txt") ($(part_time "$t"))" \
              || record tests FAIL "$(tail -1 "$WORK/tests-compare.txt"); logs: $WORK/tests-arm.log"
fi

# -- 6. logits: every family's f32/int8/int4 bundle, exported on x86, run on both --------------------------
if want logits; then
  t=$(date +%s)
  ok=1
  log "x86: tiny random checkpoints, f32/int8/int4 bundles, x86 logits"
  (cd "$ROOT" && $NICE "$HOSTPY" -P tests/pi/pi_host.py logits-prep "$WORK") >"$WORK/logits-x86.log" 2>&1 \
    || { ok=0; log "x86 side failed: $WORK/logits-x86.log"; }
  for cpu in "${CPUS[@]}"; do
    log "guest ($cpu): logits of every bundle"
    guest "$cpu" "$GV -P tests/pi/pi_common.py guest-logits /pi/work $cpu" >"$WORK/logits-arm-$cpu.log" 2>&1 \
      || { ok=0; log "guest logits ($cpu) failed: $WORK/logits-arm-$cpu.log"; }
  done
  [ $ok = 1 ] && record logits ok "run on ${CPUS[*]}; table in $WORK/report.md ($(part_time "$t"))" \
              || record logits FAIL "see $WORK/logits-*.log"
fi

# -- 7. memory: peak RSS of the demo and of real-shape int8/int4 bundles ------------------------------------
if want memory; then
  t=$(date +%s)
  ok=1
  log "x86: mamba-130m and RWKV-7 0.1B shapes (random weights), int8/int4 bundles, x86 peak RSS"
  (cd "$ROOT" && $NICE "$HOSTPY" -P tests/pi/pi_host.py mem-prep "$WORK") >"$WORK/memory-x86.log" 2>&1 \
    || { ok=0; log "x86 side failed: $WORK/memory-x86.log"; }
  log "guest ($CPU0): peak RSS, one fresh process per bundle"
  guest "$CPU0" "$GV -P tests/pi/pi_common.py guest-memory /pi/work $CPU0" >"$WORK/memory-arm.log" 2>&1 \
    || { ok=0; log "guest memory failed: $WORK/memory-arm.log"; }
  [ $ok = 1 ] && record memory ok "table in $WORK/report.md ($(part_time "$t"))" || record memory FAIL "see $WORK/memory-*.log"
fi

# -- report ------------------------------------------------------------------------------------------------
if want logits || want memory; then
  PI_ROOTFS=$R "$HOSTPY" "$ROOT/tests/pi/pi_host.py" report "$WORK" "${CPUS[@]}" --parts "${PARTS[@]}" \
    || { FAILED=1; SUMMARY+=("report   FAIL a check in $WORK/report.md failed (FAIL lines above)"); }
fi
echo
echo "pi-check summary (aarch64 under qemu-user; wall time $(( $(date +%s) - T_START )) s; work files in $WORK):"
printf '  %s\n' "${SUMMARY[@]}"
exit $FAILED
