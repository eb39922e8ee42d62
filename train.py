"""Train a GPT: python train.py --config configs/shakespeare_char.yaml [--key value ...]"""

from tinygpt_pl.training.safety.signals import install, stop_while_starting

install(stop_while_starting)  # first: importing torch and Lightning takes seconds

from tinygpt_pl.training.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
