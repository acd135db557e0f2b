"""Train random features or a two-layer net: ``python train.py model=frozen d=64``."""

import hydra
from omegaconf import DictConfig

from randfeat_torch.cli import run


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float:
    return run(cfg)


if __name__ == "__main__":
    main()
