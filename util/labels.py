"""Label values the datasets, losses and metrics agree on."""

# The mask value of a pixel without a label (VOC's object borders, Cityscapes' void classes,
# crop padding): excluded from every loss and count. The datasets' own convention, and the last
# value an 8-bit mask can hold, so class ids 0..254 stay free.
IGNORE_INDEX = 255
