"""What a checkpoint file is, told by its content (TorchScript archive, safetensors header), the
marker of a refined state dict, and the one-line reason a loader refused a file."""

from __future__ import annotations

import re
import struct
import zipfile
from pathlib import Path

STATE_FORMAT = "lsr-refined-state-dict/1"

TRUST_WARNING = (
    "{path}: loaded with model.trust_checkpoint (unrestricted unpickling: any code in the file ran); "
    "use only files from sources you trust"
)
# torch modules whose functions may be named in a checkpoint (activation functions and other
# math on tensors: nothing that reads files, imports or runs code)
_TORCH_FUNCTION_MODULES = (
    "torch.nn.functional",
    "torch._C._nn",
    "torch._C._special",
    "torch._C._fft",
    "torch._C._linalg",
    "torch.special",
    "torch.fft",
    "torch.linalg",
)


def _is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    return any("/code/" in n or n.endswith("constants.pkl") for n in names)


def _refusal_reason(exc: Exception) -> str:
    text = str(exc)
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if m:
        return f"it pickles the Python object {m.group(1)}"
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if len(first) < 8 or first.isdigit():
        return f"unrecognized content ({type(exc).__name__})"
    return first[:160]


def _is_safetensors(path: Path) -> bool:
    """A safetensors file: 8 bytes of little-endian header length, then a JSON object."""
    with path.open("rb") as fh:
        head = fh.read(9)
    if len(head) < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 8 + length <= path.stat().st_size
