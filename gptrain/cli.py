"""The `gptrain` command: each subcommand hands its arguments to the module that does the work."""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "prepare": ("gptrain.prepare", "tokenize a corpus into train.bin / val.bin / meta.json"),
    "train": ("gptrain.train", "train or fine-tune a model: [config.yaml ...] [key=value ...]"),
    "generate": ("gptrain.generate", "sample text from a checkpoint"),
    "eval": ("gptrain.evaluate", "loss, perplexity and bits per byte of a checkpoint over a whole split"),
    "export": ("gptrain.export", "write a checkpoint as a Hugging Face GPT-2 or Llama directory"),
    "harness": ("gptrain.harness", "score a checkpoint on lm-evaluation-harness tasks (exports it to a temporary directory)"),
    "serve": ("gptrain.serve", "an OpenAI-compatible HTTP API and a playground page for a checkpoint"),
    "launch": ("gptrain.launch", "torchrun, where SIGTERM/SIGUSR1 checkpoints and exits 0: [torchrun args] train.py ..."),
    "plot": ("gptrain.plot", "draw runs' loss curves against tokens seen into a PNG: RUN_DIR [...] -o curves.png"),
}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in SUBCOMMANDS:
        usage = "\n".join(f"  {name:<10} {help}" for name, (_, help) in SUBCOMMANDS.items())
        asked = bool(args) and args[0] in ("-h", "--help")
        print(f"usage: gptrain <command> [args]\n\ncommands:\n{usage}\n\n'gptrain <command> --help' for details",
              file=sys.stdout if asked else sys.stderr)
        sys.exit(0 if asked else 2)
    module = importlib.import_module(SUBCOMMANDS[args[0]][0])  # import only what this command needs
    module.main(args[1:])


if __name__ == "__main__":
    main()
