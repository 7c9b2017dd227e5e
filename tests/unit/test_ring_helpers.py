"""The inline ring helpers and the compile-time layout checks of nmb_netmap.h, in C."""

from __future__ import annotations

import subprocess
from pathlib import Path

INCLUDE = Path(__file__).resolve().parents[2] / "nmbridge" / "include"

PROGRAM = r"""
#include <assert.h>
#include <stdlib.h>
#include "nmb_netmap.h"
int main(void) {
    struct netmap_ring *r = aligned_alloc(128, 256 + 8 * 16);
    *(uint32_t *)&r->num_slots = 8;
    assert(nmb_ring_next(r, 0) == 1 && nmb_ring_next(r, 7) == 0);
    r->head = 2; r->tail = 5;  assert(nmb_ring_space(r) == 3 && !nmb_ring_empty(r));
    r->head = 6; r->tail = 1;  assert(nmb_ring_space(r) == 3);   /* wraps */
    r->head = 4; r->tail = 4;  assert(nmb_ring_space(r) == 0 && nmb_ring_empty(r));
    r->head = 5; r->tail = 4;  assert(nmb_ring_space(r) == 7);   /* all but one */
    *(int64_t *)&r->buf_ofs = 4096; *(uint32_t *)&r->nr_buf_size = 2048;
    assert(NETMAP_BUF(r, 3) == (char *)r + 4096 + 3 * 2048);
    /* netmap_if: TX rings first, host TX, then RX rings */
    int64_t *nif = aligned_alloc(8, 56 + 5 * 8);
    struct netmap_if *nifp = (struct netmap_if *)nif;
    *(uint32_t *)&nifp->ni_tx_rings = 2; *(uint32_t *)&nifp->ni_rx_rings = 2;
    *(uint32_t *)&nifp->ni_host_tx_rings = 1; *(uint32_t *)&nifp->ni_host_rx_rings = 0;
    for (int i = 0; i < 5; i++) ((int64_t *)nifp->ring_ofs)[i] = 1000 * (i + 1);
    assert((char *)NETMAP_TXRING(nifp, 1) == (char *)nifp + 2000);
    assert((char *)NETMAP_RXRING(nifp, 0) == (char *)nifp + 4000);
    assert((char *)NETMAP_RXRING(nifp, 1) == (char *)nifp + 5000);
    return 0;
}
"""


def compile_and_run(tmp_path: Path, source: str, *extra: str) -> subprocess.CompletedProcess[str]:
    c = tmp_path / "t.c"
    c.write_text(source)
    exe = tmp_path / "t"
    built = subprocess.run(["gcc", "-std=gnu11", "-Wall", "-Werror", f"-I{INCLUDE}", *extra, str(c), "-o",
                            str(exe)], capture_output=True, text=True)
    if built.returncode != 0:
        return built
    return subprocess.run([str(exe)], capture_output=True, text=True)


def test_ring_helpers(tmp_path: Path) -> None:
    done = compile_and_run(tmp_path, PROGRAM)
    assert done.returncode == 0, done.stderr


def test_a_layout_mistake_fails_the_build(tmp_path: Path) -> None:
    """Move one field of a copy of the header: the _Static_asserts must stop the build."""
    broken = tmp_path / "inc"
    broken.mkdir()
    text = (INCLUDE / "nmb_netmap.h").read_text()
    text = text.replace("    uint32_t head;\n    uint32_t cur;", "    uint32_t cur;\n    uint16_t head;", 1)
    (broken / "nmb_netmap.h").write_text(text)
    c = tmp_path / "t.c"
    c.write_text('#include "nmb_netmap.h"\nint main(void) { return 0; }\n')
    done = subprocess.run(["gcc", "-std=gnu11", f"-I{broken}", str(c), "-o", str(tmp_path / "t")],
                          capture_output=True, text=True)
    assert done.returncode != 0
    assert "netmap_ring.head must be at offset 20" in done.stderr
