"""retain_freed_memory: freed large blocks stay in the process (glibc), and the switch to turn it off."""
import subprocess
import sys

import pytest

SCRIPT = """
import clipforge, torch
def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
applied = clipforge.retain_freed_memory()
before = rss_mib()
block = torch.ones(64 * 2**20 // 4)  # 64 MiB, above glibc's largest mmap threshold
del block
print(applied, round(rss_mib() - before))
"""


def _run(env_value: str | None) -> tuple[bool, int]:
    import os
    env = {k: v for k, v in os.environ.items() if k != "CLIPFORGE_RETAIN_FREED_MEMORY"}
    if env_value is not None:
        env["CLIPFORGE_RETAIN_FREED_MEMORY"] = env_value
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    applied, kept = out.stdout.split()
    return applied == "True", int(kept)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_stay_in_the_process_unless_turned_off():
    applied, kept_mib = _run(None)
    assert applied and kept_mib >= 60  # the freed 64 MiB is still resident, ready for the next tensor
    applied, kept_mib = _run("0")
    assert not applied and kept_mib < 16  # glibc's default: unmapped on free
