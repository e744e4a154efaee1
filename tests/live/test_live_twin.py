"""Twin tests: every scenario of :mod:`labkit.twin` on a real guest under QEMU and on the model, on
the same timeline (the model follows the real run's clock), each check with its tolerance and the
cause that allows it (printed under "live figures" and by ``labkit twin``).

What they hold (docs/mechanisms.md §10, §11): /proc/zoneinfo's watermarks, spans, managed pages,
lowmem_reserve and per-CPU list sizes exactly, and MemTotal to 0.1 MiB, at 512 MiB, 1 GiB and 4 GiB
(ZONE_NORMAL above 4 GiB); the balloon at 1 GiB and 4 GiB (actual and MemTotal exactly, MemFree
within 8 MiB after inflate + deflate, host RSS within 16 MiB); free page reporting at 1 GiB and
512 MiB (host RSS within 16 MiB, the staircase within 32 MiB at every 500 ms sample for 8 s);
OOM deflate; virtio-mem's unplug under online_kernel (within a factor of 2) and online_movable
(all of it); and a real migration to a second QEMU on 127.0.0.1, idle and busy, with and without
free page hinting (completion, normal pages and bytes within 30 %, dirty syncs within 2, the model's
time a floor). One VM boots per scenario (two for a migration); about 3 minutes under TCG.
"""

from __future__ import annotations

import pytest

from labkit.twin import SCENARIOS, run_twin

pytestmark = pytest.mark.live


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_twin(name, figures):
    result = run_twin(name, mode="live")
    assert result.source == "live"
    for r in result.results:
        figures[f"twin {name}: {r['check']}"] = (
            f"real {r['real']:.1f}, model {r['model']:.1f} ({'holds' if r['holds'] else 'FAILS'})")
    failures = "\n".join(f"{r['check']}: real {r['real']:.2f} vs model {r['model']:.2f} "
                         f"(tolerance {r['tolerance']} {r['unit']}, {r['mode']}); cause: {r['cause']}"
                         for r in result.failures())
    assert result.holds, f"{name}:\n{failures}"
