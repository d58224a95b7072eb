"""Cut sets on hand-written graphs: no TensorFlow needed."""

from dnnpipe.partition.graph import GraphTensor, UnitGraph


def names(tensors):
    return [t.name for t in tensors]


def test_residual_skip_crosses_the_cuts_it_spans():
    # image -> 1:a -> 2:b -> 3:add(a, b) -> 4:out
    tensors = (GraphTensor("image", 0, 1, (None, 4), "float32"), GraphTensor("a", 1, 3, (None, 4), "float32"),
               GraphTensor("b", 2, 3, (None, 4), "float32"), GraphTensor("add", 3, 4, (None, 4), "float32"),
               GraphTensor("out", 4, 5, (None, 2), "float32"))
    graph = UnitGraph(("a", "b", "add", "out"), tensors, ("out",))
    assert [names(graph.crossing(j)) for j in range(5)] == [["image"], ["a"], ["a", "b"], ["add"], ["out"]]
    assert graph.cut_bytes(2) == 32


def test_early_output_and_second_input_cross_until_used():
    # x -> 1:h; y read by unit 3; h is also a model output
    tensors = (GraphTensor("x", 0, 1, (None, 1), "float32"), GraphTensor("y", 0, 3, (None, 1), "int32"),
               GraphTensor("h", 1, 5, (None, 1), "float32"), GraphTensor("g", 2, 3, (None, 1), "float32"),
               GraphTensor("z", 3, 5, (None, 1), "float32"), GraphTensor("w", 4, 5, (None, 1), "float32"))
    graph = UnitGraph(("h", "g", "z", "w"), tensors, ("w", "h", "z"))
    assert names(graph.crossing(0)) == ["x", "y"]
    assert names(graph.crossing(1)) == ["y", "h"]
    assert names(graph.crossing(2)) == ["y", "h", "g"]
    assert names(graph.crossing(3)) == ["h", "z"]
    assert names(graph.crossing(4)) == ["w", "h", "z"]  # the model's output order
