"""The basis record of the random-basis tuners (``delta.basis_record``): NOLA and sparse RandLoRA refuse, before
loading and naming the layer and the fix, a checkpoint whose record is missing or not integers, whose config was
edited away from the record (seed, rank, numbers of bases, density) or from the coefficients' shapes, or whose bases
regenerate differently (checksum)."""

from __future__ import annotations

import pytest
from _builders import BUILDERS, edit_adapter_config
from peft import PeftModel
from safetensors.torch import load_file, save_file
from test_nola import saved_nola
from test_sparse_randlora import saved as saved_sparse_randlora

SAVERS = {"nola": saved_nola, "sparse_randlora": saved_sparse_randlora}
#: what a checksum mismatch tells each method's user to do (NOLA can carry its bases in the checkpoint)
CHECKSUM_FIX = {"nola": r"save_basis=True", "sparse_randlora": r"torch version it was trained with"}


@pytest.mark.parametrize(
    "method,field,value,match",
    [
        ("nola", "basis_seed", 5,
         r"basis_seed=0, but its config says NolaConfig\.basis_seed=5.*Fix: set basis_seed=0"),
        ("nola", "r", 3, r"r=4, but its config says NolaConfig\.r=3.*Fix: set r=4"),
        ("nola", "num_basis_A", 13,
         r"\(12,\) nola_alpha coefficients but NolaConfig\.num_basis_A=13.*Fix.*num_basis_A=12"),
        ("nola", "num_basis_B", 9,
         r"\(10,\) nola_beta coefficients but NolaConfig\.num_basis_B=9.*Fix.*num_basis_B=10"),
        ("sparse_randlora", "basis_seed", 9,
         r"basis_seed=0, but its config says SparseRandLoraConfig\.basis_seed=9.*Fix: set basis_seed=0"),
        ("sparse_randlora", "basis_density", 0.5,
         r"basis_density=0\.25, but .*basis_density=0\.5.*Fix: set basis_density=0\.25"),
        ("sparse_randlora", "r", 5,
         r"sparse_randlora_lambda has shape \(4, 9\) but SparseRandLoraConfig\.r=5.*\(5, 8\).*Fix"),
    ],
    ids=lambda v: str(v),
)
def test_config_not_matching_the_checkpoint_is_refused(tmp_path, method, field, value, match):
    SAVERS[method](tmp_path)
    edit_adapter_config(tmp_path, **{field: value})
    with pytest.raises(ValueError, match=match):
        PeftModel.from_pretrained(BUILDERS["roberta"]()[0], tmp_path)


@pytest.mark.parametrize("damage", ["checksum", "missing", "float"])
@pytest.mark.parametrize("method", list(SAVERS))
def test_damaged_basis_record_is_refused(tmp_path, method, damage):
    SAVERS[method](tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    sd = load_file(path)
    record = f"{method}_basis_key"
    key = next(k for k in sorted(sd) if k.endswith(record))
    fields = sd[key].numel()
    if damage == "checksum":
        sd[key] = sd[key].clone()
        sd[key][-1] += 1
        match = rf"regenerated from basis_seed=0 differ.*Fix.*{CHECKSUM_FIX[method]}"
    elif damage == "missing":
        del sd[key]
        match = rf"no basis record '{record}'.*Fix: re-save"
    else:
        sd[key] = sd[key].float()
        match = rf"{record} has shape \({fields},\) and dtype torch.float32.*corrupted"
    save_file(sd, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=match) as info:
        PeftModel.from_pretrained(BUILDERS["roberta"]()[0], tmp_path)
    assert key.removeprefix("base_model.model.").removesuffix(f".{record}") in str(info.value)
