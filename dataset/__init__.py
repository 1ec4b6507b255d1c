"""Datasets, split lists, transforms and the generated toy dataset.

Import from the modules (kept apart so that the split tools and the toy generator run without
importing torch):
    dataset.registry    dataset specs: class counts, names, palettes, eval modes
    dataset.splits      split files: read_split, derive_unlabeled (COCO), make_custom_split
    dataset.transforms  resize, pad_and_crop, hflip, normalize, strong_color, cutmix_box
    dataset.semi        SemiDataset, split_paths, build_semi_datasets
    dataset.toy         ensure_toy, the zero-download generated dataset
"""
