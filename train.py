"""Train a GPT: python train.py --config configs/shakespeare_char.yaml [--key value ...]"""

from tinygpt_pl.cli import main

if __name__ == "__main__":
    main()
