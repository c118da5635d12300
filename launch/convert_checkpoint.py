"""Convert checkpoints between Hugging Face safetensors and sdar_jax params.

  python launch/convert_checkpoint.py hf-to-jax --hf HF_DIR --out CKPT_DIR [--dtype bfloat16|float32]
  python launch/convert_checkpoint.py jax-to-hf --ckpt CKPT_DIR --out HF_DIR [--dtype bfloat16|float32]

`hf-to-jax` reads `config.json` and `model.safetensors` (or shards listed in
`model.safetensors.index.json`) and writes CKPT_DIR with `config.json`, the
orbax params under `params/` and the tokenizer files. `jax-to-hf` writes
safetensors (sharded past --max-shard-size) and a `config.json` that
`transformers.AutoModelForCausalLM.from_pretrained` loads. Without --dtype the
source's dtype is kept. Both directions stream (peak memory does not grow
with the model) and keep the source's model_type, architectures and other
config.json keys. Bad input (a damaged file, an unwritable or existing --out,
--out equal to the input) exits with status 2 and a one-line reason, before
anything is written.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Sequence

from sdar_jax.checkpoint.dtypes import NUMPY_DTYPES
from sdar_jax.checkpoint.errors import ConversionError
from sdar_jax.config import ConfigError, export_model_type
from sdar_jax.convert.from_hf import hf_to_jax
from sdar_jax.convert.safetensors_io import DEFAULT_MAX_SHARD_BYTES
from sdar_jax.convert.to_hf import ExportWarning, jax_to_hf


def _size(text: str) -> int:
    """'500MB' / '5GB' / '100KB' / '1234' -> bytes (powers of 1000, like transformers)."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit) and upper[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(upper[: -len(unit)]) * factor)
    if upper.isdigit():
        return int(upper)
    raise argparse.ArgumentTypeError(f"not a size: {text!r} (expected e.g. 5GB, 500MB, 100KB)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convert_checkpoint", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    dtypes = tuple(NUMPY_DTYPES)

    to_jax = sub.add_parser("hf-to-jax", help="Hugging Face safetensors dir -> sdar_jax params checkpoint")
    to_jax.add_argument("--hf", required=True, help="Hugging Face model directory")
    to_jax.add_argument("--out", required=True, help="checkpoint directory to create")
    to_jax.add_argument("--dtype", choices=dtypes, default=None,
                        help="param dtype (default: bfloat16 if the files are all BF16, else float32)")
    to_jax.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    to_hf = sub.add_parser("jax-to-hf", help="sdar_jax params checkpoint -> Hugging Face safetensors dir")
    to_hf.add_argument("--ckpt", required=True, help="params checkpoint directory")
    to_hf.add_argument("--out", required=True, help="Hugging Face directory to create")
    to_hf.add_argument("--dtype", choices=dtypes, default=None,
                       help="tensor dtype to write (default: the checkpoint's)")
    to_hf.add_argument("--max-shard-size", type=_size, default=DEFAULT_MAX_SHARD_BYTES,
                       help="largest safetensors shard, e.g. 5GB (default 5 GiB)")
    to_hf.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command; returns the exit status (0 ok, 2 bad input)."""
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ExportWarning)
        try:
            if args.command == "hf-to-jax":
                config = hf_to_jax(args.hf, args.out, args.dtype, overwrite=args.overwrite)
            else:
                config = jax_to_hf(
                    args.ckpt, args.out, args.dtype, max_shard_bytes=args.max_shard_size,
                    overwrite=args.overwrite,
                )
        except (ConversionError, ConfigError, OSError) as e:
            # One line says what is wrong; a tensor check adds one line per mismatch.
            # (OSError: the disk filled up or vanished while writing; its message names the file.)
            print(f"convert_checkpoint: error: {e}", file=sys.stderr)
            return 2
    for warning in caught:
        if issubclass(warning.category, ExportWarning):
            print(f"convert_checkpoint: warning: {warning.message}", file=sys.stderr)
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    print(
        f"wrote {args.out}: {export_model_type(config)}, {config.num_layers} layers, "
        f"{config.num_params / 1e6:.1f}M params, {config.param_dtype}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
