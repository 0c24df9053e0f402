"""Sample from a checkpoint: python generate.py --model_path checkpoints/ckpt.pt --prompt "...". See gptrain/generate.py."""

from gptrain.generate import main

if __name__ == "__main__":
    main()
