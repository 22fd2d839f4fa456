"""One heal of the sharp tiny Llama's two sites, as a one-process run or as one rank of a
distributed run (``RANK``/``WORLD_SIZE``… in the environment, as torchrun sets them): the
healed weights go to ``OUT/rank<r>.safetensors``. ``tests/test_heal.py`` compares them."""

from __future__ import annotations

import sys

import torch

from dtr_compile.data import Dataset
from dtr_compile.heal.loss import record_targets
from dtr_compile.heal.train import HealSettings, heal
from dtr_compile.parallel import Group, from_env
from dtr_compile.passes.find_attention import find_attention

SETTINGS = HealSettings(steps=6, rows_per_step=3, lr=3e-3, eval_every=3, patience=0, rank=2)


def run(group: Group) -> dict[str, torch.Tensor]:
    """The healed students' weights (``<site>.<name>``)."""
    from dtr_compile.linear import make_student
    from tests.test_heal import VOCAB, SharpLlama, _capture

    torch.set_num_threads(1)
    ids = torch.randint(1, VOCAB, (12, 24), generator=torch.Generator().manual_seed(1))
    gm, names = _capture(SharpLlama(), {"input_ids": ids[:2, :16].clone()})
    sites = find_attention(gm).sites
    calib = Dataset({"input_ids": ids}, None)
    students = {}
    for i, s in enumerate(sites):  # seeded, not distilled: the same modules in every process
        torch.manual_seed(100 + i)
        st = make_student("hedgehog", num_heads=s.num_heads, num_kv_heads=s.num_kv_heads,
                          head_dim=s.head_dim, head_dim_v=s.head_dim_v, mask_kind=s.mask_kind,
                          causal=True, scale=s.scale, window=4)
        with torch.no_grad():
            for p in st.parameters():
                p.add_(0.1 * torch.randn_like(p))
        students[s.id] = st.eval()
    targets = record_targets(gm, calib, names, "token-kl", batch_size=4, top_k=16, group=group)
    healed = heal(gm, sites, students, [s.id for s in sites], calib, names, targets, SETTINGS,
                  group=group)
    return {f"{sid}.{k}": v for sid, m in healed.students.items()
            for k, v in m.state_dict().items()}


if __name__ == "__main__":
    from safetensors.torch import save_file

    group = from_env(torch.device("cpu"))
    try:
        state = run(group)
        save_file({k: v.contiguous() for k, v in state.items()},
                  f"{sys.argv[1]}/rank{group.rank}.safetensors")
    finally:
        group.close()
