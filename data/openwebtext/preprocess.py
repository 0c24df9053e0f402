"""Prepare OpenWebText for GPT-2 training: `gptrain prepare` with nanoGPT's OpenWebText defaults.

    python data/openwebtext/preprocess.py --tokenizer gpt2        # ~8M documents -> data/openwebtext/
    python data/openwebtext/preprocess.py --max_docs 10000         # a quick subset; any flag passes through

Downloads Skylion007/openwebtext with the Hugging Face datasets library, holds out 0.05% of the
documents for validation (seed 2357, as nanoGPT), appends <|endoftext|> after every document and
writes train.bin, val.bin, meta.pkl and meta.json beside this file. See docs/data.md for time and disk.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from gptrain.prepare import main  # noqa: E402

DEFAULTS = [
    "--dataset", "Skylion007/openwebtext",
    "--val_fraction", "0.0005",
    "--seed", "2357",
    "--tokenizer", "gpt2",
    "--out_dir", str(Path(__file__).resolve().parent),
]

if __name__ == "__main__":
    main(DEFAULTS + sys.argv[1:])  # flags given later win
