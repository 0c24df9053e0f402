"""Train a GPT: python train.py [config.yaml] [key=value ...]  (also under torchrun). See gptrain/train.py."""

from gptrain.train import main

if __name__ == "__main__":
    main()
