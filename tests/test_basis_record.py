"""The basis record of the random-basis tuners (``delta.basis_record``): NOLA and sparse RandLoRA refuse a checkpoint
whose record is missing, not integers, or names other bases than the config regenerates, before loading, naming the
layer and the fix. (Config fields that differ from the record: each tuner's own test file.)"""

from __future__ import annotations

import pytest
from _builders import BUILDERS
from peft import PeftModel
from safetensors.torch import load_file, save_file
from test_nola import saved_nola
from test_sparse_randlora import saved as saved_sparse_randlora

SAVERS = {"nola": saved_nola, "sparse_randlora": saved_sparse_randlora}
#: what a checksum mismatch tells each method's user to do (NOLA can carry its bases in the checkpoint)
CHECKSUM_FIX = {"nola": r"save_basis=True", "sparse_randlora": r"torch version it was trained with"}


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
