"""Datasets: Fashion-MNIST and digits with fixed train/calib/test splits, and image folders."""

from lowbit.data.datasets import DATASETS, dataset_info, load_split, make_loader
from lowbit.data.fashion_mnist import load_fashion_mnist
from lowbit.data.image_folder import ImageFolder, folder_loader
from lowbit.data.loaders import TensorLoader

__all__ = ["DATASETS", "dataset_info", "load_split", "make_loader", "load_fashion_mnist",
           "ImageFolder", "folder_loader", "TensorLoader"]
