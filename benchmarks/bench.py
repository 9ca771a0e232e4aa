"""edgeseq's benchmark harness: `python benchmarks/bench.py run|compare|report|agree|profile|list ...`.

The harness is the package benchmarks/harness/, which Python finds because it puts this script's folder
on sys.path. Where it does not (-P, PYTHONSAFEPATH), the script runs the same thing as
`PYTHONPATH=benchmarks python -P -m harness ...`. See benchmarks/README.md and docs/benchmarks.md."""
import os
import sys

try:
    from harness.cli import main
except ModuleNotFoundError:
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p))
    os.execve(sys.executable, [sys.executable, "-P", "-m", "harness", *sys.argv[1:]], env)

if __name__ == "__main__":
    main()
