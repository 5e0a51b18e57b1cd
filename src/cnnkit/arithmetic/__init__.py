"""The arithmetic of convolutional networks, as plain functions of sizes (no tensors).

- :mod:`~cnnkit.arithmetic.sizes`: output sizes, 'same'/'valid' padding, transposed convolutions,
  receptive fields.
- :mod:`~cnnkit.arithmetic.costs`: one layer's parameters and multiplications, the 1x1 bottleneck,
  depthwise-separable convolutions, the transposed convolution worked by hand.
- :mod:`~cnnkit.arithmetic.scaling`: EfficientNet's compound scaling and the cost of the scaled model.

``cnnkit arith`` asks these questions from the command line.
"""

from cnnkit.arithmetic.costs import (
    Bottleneck,
    ConvLayer,
    Separable,
    TransposedStep,
    bottleneck,
    conv_layer,
    fitting_sizes,
    parse_padding,
    separable,
    transposed_steps,
)
from cnnkit.arithmetic.scaling import (
    EFFICIENTNET_B0,
    EFFICIENTNET_SCALING,
    PUBLISHED_COST,
    MBConvStage,
    Scaling,
    StageRow,
    compound_scaling,
    efficientnet_table,
    flops_factor,
    make_divisible,
)
from cnnkit.arithmetic.sizes import (
    LayerGeometry,
    Padding,
    ReceptiveField,
    conv_output_size,
    conv_transpose_output_size,
    effective_kernel,
    output_size,
    padding_for,
    receptive_field,
    same_padding,
)

__all__ = [
    "EFFICIENTNET_B0",
    "EFFICIENTNET_SCALING",
    "PUBLISHED_COST",
    "Bottleneck",
    "ConvLayer",
    "LayerGeometry",
    "MBConvStage",
    "Padding",
    "ReceptiveField",
    "Scaling",
    "Separable",
    "StageRow",
    "TransposedStep",
    "bottleneck",
    "compound_scaling",
    "conv_layer",
    "conv_output_size",
    "conv_transpose_output_size",
    "effective_kernel",
    "efficientnet_table",
    "fitting_sizes",
    "flops_factor",
    "make_divisible",
    "output_size",
    "padding_for",
    "parse_padding",
    "receptive_field",
    "same_padding",
    "separable",
    "transposed_steps",
]
