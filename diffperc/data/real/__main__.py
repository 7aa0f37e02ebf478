"""``python -m diffperc.data.real {Hypersim,FlyingChairs,Pix2Gestalt} <root> [<filename_list>]``: the first sample's
keys, shapes and dtypes, to check a data set's layout before training on it."""

import sys

import torch

from diffperc.data.real import FlyingChairsDataset, HypersimDataset, Pix2GestaltDataset

if __name__ == "__main__":
    readers = {"Hypersim": HypersimDataset, "FlyingChairs": FlyingChairsDataset, "Pix2Gestalt": Pix2GestaltDataset}
    if len(sys.argv) < 3 or sys.argv[1] not in readers:
        sys.exit(f"usage: python -m diffperc.data.real {{{','.join(readers)}}} <root> [<filename_list>]")
    sample = readers[sys.argv[1]](*sys.argv[2:])[0]
    for key, value in sample.items():
        print(key, tuple(value.shape) if torch.is_tensor(value) else value, getattr(value, "dtype", ""))
