"""Fuzz mars-serve's HTTP API from its own OpenAPI schema with schemathesis:
every generated request must get an answer that is not a server error.

Starts mars-serve itself (two engine instances of the tiny model, Redis, one
ingress), runs `schemathesis run <endpoint>/openapi.json --checks
not_a_server_error`, and writes the number of cases and any failure to
`docs/results/api_fuzz.json`.

    python -m bench.fuzz_api --max-examples 50
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.openai_conformance import mars_serve

REPO_ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO_ROOT / "models" / "tiny"))
    parser.add_argument("--max-examples", type=int, default=50, help="cases per operation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO_ROOT / "docs/results/api_fuzz.json"))
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory() as tmp,
        mars_serve(Path(args.model), Path(tmp), served="tiny", tool_parser=None) as url,
    ):
        started = time.monotonic()
        command = [
            str(Path(sys.executable).with_name("schemathesis")), "run", f"{url}/openapi.json",
            "--checks", "not_a_server_error", "--max-examples", str(args.max_examples),
            "--seed", str(args.seed), "--workers", "1", "--request-timeout", "120",
            "--suppress-health-check", "all", "--output-sanitize", "false",
        ]  # fmt: skip
        run = subprocess.run(command, capture_output=True, text=True, check=False)
        elapsed = time.monotonic() - started
    report = run.stdout + run.stderr
    print(report[-6000:])
    cases = re.findall(r"(\d+) generated", report)
    result = {
        "command": " ".join(command[1:]).replace(url, "<endpoint>"),
        "exit_code": run.returncode,
        "generated_cases": int(cases[-1]) if cases else None,
        "server_errors": [int(n) for n in re.findall(r"Server error: (\d+)", report)][-1:] or [0],
        "seconds": round(elapsed, 1),
        "summary": report.strip().splitlines()[-12:],
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "summary"}))
    sys.exit(run.returncode)


if __name__ == "__main__":
    main()
