"""wsiseg: tumour segmentation of whole-slide images with an Inception-ResNet-v2 U-Net."""

__version__ = "0.1.0"
