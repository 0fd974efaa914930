"""The meta-device op counter that workloads and the CPU profiler share."""

import torch
import torch.nn.functional as F

from residency.workload.op_count import OpCounter


def test_elementwise_ops_count_their_inputs_and_outputs():
    x, y = torch.empty(4, 8, device="meta"), torch.empty(4, 8, device="meta")
    with OpCounter() as c:
        (x + y).relu()
    assert (c.ops, c.kernels) == (2, 2)
    assert c.elements == (32 + 32 + 32) + (32 + 32)


def test_views_are_ops_but_not_kernels_and_move_nothing():
    x = torch.empty(4, 8, device="meta")
    with OpCounter() as c:
        x.view(8, 4).t()
    assert (c.ops, c.kernels, c.elements) == (2, 0, 0)


def test_matmuls_and_convolutions_are_timed_by_flops_not_elements():
    x, w = torch.empty(16, 256, device="meta"), torch.empty(768, 256, device="meta")
    img, k = torch.empty(1, 8, 16, 16, device="meta"), torch.empty(8, 8, 3, 3, device="meta")
    with OpCounter() as c:
        F.linear(x, w)
        F.conv2d(img, k, padding=1)
    assert c.kernels >= 2
    assert c.elements == 0


def test_allocation_moves_no_elements_but_a_copy_does():
    x = torch.empty(10, device="meta")
    with OpCounter() as c:
        torch.empty_like(x).copy_(x)
    assert c.elements == 20


def test_undecomposed_linear_and_attention_under_inference_mode_are_not_elementwise():
    x, w = torch.empty(16, 256, device="meta"), torch.empty(768, 256, device="meta")
    q = torch.empty(1, 4, 16, 64, device="meta")
    with torch.inference_mode(), OpCounter() as c:
        F.linear(x, w)
        F.scaled_dot_product_attention(q, q, q)
    assert c.kernels >= 2
    assert c.elements == 0


def test_elements_are_filed_under_the_size_class_of_the_largest_tensor():
    from residency.workload.op_count import size_class

    assert [size_class(n) for n in (1, 4096, 4097, 65536, 70000)] == [4096, 4096, 16384, 65536, 262144]
    small, big = torch.empty(16, 256, device="meta"), torch.empty(256, 256, device="meta")
    with OpCounter() as c:
        small.relu()  # 4096 + 4096 elements, class 4096
        big.sum(0)  # 65536 + 256 elements, class 65536
    assert c.elements_by_size == {4096: 8192, 65536: 65792}
    assert c.counts()["activation_elements_by_size"] == [[4096, 8192], [65536, 65792]]
