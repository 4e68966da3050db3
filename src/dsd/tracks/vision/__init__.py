"""Vision track: GoogLeNet, VGG-16, ResNet-18 and ResNet-50 on ImageNet, and their miniatures on `shapes`."""
