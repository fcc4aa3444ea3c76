"""The paper's architectures have the published parameter counts."""

import pytest
import torch
from paper.models import build_model, count_parameters


@pytest.mark.parametrize(
    "name,in_shape,classes,params",
    [
        ("lenet300", (1, 28, 28), 10, 266_610),
        ("lenet5", (1, 28, 28), 10, 431_080),
        ("vgg16", (3, 32, 32), 10, 14_728_266),
        ("vgg19", (3, 32, 32), 10, 20_040_522),
        ("resnet18", (3, 32, 32), 10, 11_173_962),
    ],
)
def test_parameter_counts_and_output_shape(name, in_shape, classes, params):
    model = build_model(name, in_shape, classes)
    assert count_parameters(model) == params
    assert model.eval()(torch.randn(2, *in_shape)).shape == (2, classes)


def test_tiny_imagenet_shapes_and_bad_name():
    assert build_model("vgg16", (3, 64, 64), 200).eval()(torch.randn(1, 3, 64, 64)).shape == (1, 200)
    with pytest.raises(ValueError, match="model must be one of"):
        build_model("alexnet", (3, 32, 32), 10)
