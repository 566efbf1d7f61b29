"""One process of the shared-limits tests: map N items through a handle whose limits
are shared by URL, print what happened as JSON on the last line of stdout.

    python _shared_worker.py SHARED_URL BASE_URL TAG N RPM CONCURRENCY [TPM]
(RPM, CONCURRENCY or TPM 0: none, and all 0: the default adaptive concurrency; the
rates' period is one second. With a TPM, each
call asks for max_tokens=20: it reserves its estimate, then settles to the usage.)
"""

from __future__ import annotations

import json
import sys

import fanflow
from fanflow import Limits, RetryPolicy
from fanflow.limits import DEFAULT_LIMITS


def main() -> None:
    shared, base, tag, n, rpm, concurrency = sys.argv[1:7]
    tpm = float(sys.argv[7]) if len(sys.argv) > 7 else 0.0
    # No limit given: the library's default, an adaptive concurrency (as the CLI does).
    controller = None if float(rpm) or tpm or int(concurrency) else DEFAULT_LIMITS.controller
    limits = Limits(
        rpm=float(rpm) or None,
        tpm=tpm or None,
        concurrency=int(concurrency) or None,
        period=1.0,
        shared=shared,
        controller=controller,
    )
    llm = fanflow.openai(
        "gpt-sim", base_url=base, api_key="sk-test", limits=limits, retry=RetryPolicy(seed=1)
    )
    items = [f"{tag}-{i}" for i in range(int(n))]
    options = {"max_tokens": 20} if tpm else {}
    result = fanflow.run(fanflow.map(llm, "{input}", items, **options))
    first = next((str(e) for e in result.errors.values()), None)
    out = {"ok": result.ok, "errors": len(result.errors), "first": first}
    print(json.dumps({**out, "makespan": result.makespan}))


if __name__ == "__main__":
    main()
