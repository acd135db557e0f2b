"""Train random features or a two-layer net: ``python train.py model=frozen d=64``."""

import sys

import hydra
from omegaconf import DictConfig

from randfeat_torch.cli import precheck, run
from randfeat_torch.paths import register_resolvers


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float:
    return run(cfg)


if __name__ == "__main__":
    register_resolvers()  # calc, folder, sweep_dir: the configs use them
    precheck(sys.argv[1:])  # bad input: one sentence and exit 2, before Hydra creates anything
    main()
