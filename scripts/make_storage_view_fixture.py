#!/usr/bin/env python3
"""Writes tests/fixtures/storage_views/: a PyTorch checkpoint whose tensors are views of
one shared storage, and the same values as contiguous tensors in safetensors.

`views.pt` is `torch.save({"best_state": {...}})` of views into one fused
`in_proj_weight`-like matrix `w` [24, 8] float32 (the layout audiocraft checkpoints have
for q/k/v projections, and what `state_dict()` gives for sliced parameters):

    q      = w[0:8]         storage offset 0,   contiguous
    k      = w[8:16]        storage offset 64,  contiguous
    v      = w[16:24]       storage offset 128, contiguous
    t      = w[8:16].t()    storage offset 64,  strides (1, 8)  (column-major)
    col    = w[:, 3]        storage offset 3,   stride (8,)     (strided 1-D)
    whole  = w              storage offset 0,   contiguous

All six share the single storage of `w`, so the archive holds one `data/` record and a
reader must honour each entry's storage offset and strides. `expected.safetensors` holds
contiguous clones under the same names.

Usage: python scripts/make_storage_view_fixture.py [OUT_DIR]
"""

import sys
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests" / "fixtures" / "storage_views"


def fused_weight() -> torch.Tensor:
    # 192 distinct values, all exact in float32 (multiples of 1/4), mixed signs.
    return (torch.arange(24 * 8, dtype=torch.float32) * 0.25 - 17.0).reshape(24, 8)


def views(w: torch.Tensor) -> dict:
    return {
        "q": w[0:8],
        "k": w[8:16],
        "v": w[16:24],
        "t": w[8:16].t(),
        "col": w[:, 3],
        "whole": w,
    }


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    w = fused_weight()
    state = views(w)

    # The views really share one storage, at the offsets and strides described above.
    base = w.untyped_storage().data_ptr()
    for name, t in state.items():
        assert t.untyped_storage().data_ptr() == base, name
    layout = {name: (t.storage_offset(), tuple(t.shape), t.stride()) for name, t in state.items()}
    assert layout == {
        "q": (0, (8, 8), (8, 1)),
        "k": (64, (8, 8), (8, 1)),
        "v": (128, (8, 8), (8, 1)),
        "t": (64, (8, 8), (1, 8)),
        "col": (3, (24,), (8,)),
        "whole": (0, (24, 8), (8, 1)),
    }, layout
    assert not state["t"].is_contiguous() and not state["col"].is_contiguous()

    pt = OUT / "views.pt"
    torch.save({"best_state": state}, pt)

    expected = {name: t.contiguous().clone() for name, t in state.items()}
    st = OUT / "expected.safetensors"
    save_file(expected, str(st))

    # The archive stores the shared storage once: a single data/ record of 24*8 float32.
    with zipfile.ZipFile(pt) as z:
        records = [i for i in z.infolist() if "/data/" in i.filename]
        assert len(records) == 1, [i.filename for i in records]
        assert records[0].file_size == 24 * 8 * 4, records[0].file_size
        assert any(n.endswith("/data.pkl") for n in z.namelist())

    # Round trip: torch itself reads the views back, and the safetensors file matches.
    loaded = torch.load(pt, weights_only=True)["best_state"]
    back = load_file(str(st))
    assert sorted(loaded) == sorted(back) == sorted(state)
    for name in state:
        assert loaded[name].storage_offset() == layout[name][0], name
        assert loaded[name].stride() == layout[name][2], name
        assert torch.equal(loaded[name], back[name]), name
        assert torch.equal(back[name], state[name]), name
    shared = {loaded[n].untyped_storage().data_ptr() for n in loaded}
    assert len(shared) == 1, "the reloaded views no longer share one storage"

    print(f"wrote {pt} ({pt.stat().st_size} bytes) and {st} ({st.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
