"""Hypothesis strategies for small planning instances, with memory that often binds."""

from hypothesis import strategies as st

# Speeds and sizes on a coarse grid keep sums exact, so the oracle and the planners compare
# exactly; the real profile test covers arbitrary floats.
SPEEDS = st.sampled_from([1.0, 0.5, 0.25, 0.33, 0.21, 2.0])
MBPS = st.sampled_from([1.0, 2.0, 8.0, 100.0])


@st.composite
def instances(draw, max_devices: int = 4, max_units: int = 8, roomy: bool = False):
    N = draw(st.integers(1, max_devices))
    U = draw(st.integers(1, max_units))
    E = draw(st.lists(st.integers(0, 20).map(float), min_size=U, max_size=U))
    R = draw(st.lists(st.integers(0, 10).map(float), min_size=U, max_size=U))
    C = draw(st.lists(SPEEDS, min_size=N, max_size=N))
    # Capacities around total/N make memory bind often and make some instances infeasible.
    top = max(1, int(sum(R)))
    M = draw(st.lists(st.integers(top // 2 if roomy else 0, top).map(float), min_size=N, max_size=N))
    return C, M, E, R


def cut_sets(U: int):
    """None (every boundary legal) or a random sorted subset of 1..U-1, as the TFLite converter's fusions leave."""
    return st.none() | st.sets(st.integers(1, U - 1), max_size=U - 1).map(sorted) if U > 1 else st.none()


@st.composite
def linked_instances(draw, matrix: bool = False):
    """Link Mbit/s per device (B) and bytes per cut (A) that go up and down along the model, as real activations
    do (8e-3 ms per byte at 1 Mbit/s); with `matrix` also a link between each pair (B_link), not symmetric."""
    C, M, E, R = draw(instances(roomy=draw(st.booleans())))
    N = len(C)
    B = draw(st.lists(MBPS, min_size=N, max_size=N))
    A = draw(st.lists(st.integers(0, 10_000).map(float), min_size=len(E) + 1, max_size=len(E) + 1))
    B_link = None
    if matrix:
        B_link = [[0.0 if d == e else draw(MBPS) for e in range(N)] for d in range(N)]
    return C, M, E, R, B, A, B_link


# Link CPU in ms per MB whose products with integer bytes are exact (x * A / 1e6 = m * A / 1024), and frame ms.
CPU_PER_MB = st.sampled_from([0.0, 976.5625, 1953.125, 3906.25])
FRAME_MS = st.sampled_from([0.0, 0.5, 1.0, 2.0])


@st.composite
def link_cpus(draw, N: int):
    """(send ms per MB, receive ms per MB, frame ms), N values each: device_config.link_cpu's lists."""
    return tuple(draw(st.lists(values, min_size=N, max_size=N)) for values in (CPU_PER_MB, CPU_PER_MB, FRAME_MS))


@st.composite
def linked_kinds_with_link_cpu(draw, matrix: bool = False):
    """linked_instances whose devices come in kinds (one C, M and B per kind, the E row shared), as the planners
    group them into types, with link CPU per kind or per device: devices alike in all but their link CPU must not
    be one type. (C, M, E, R, B, A, B_link, link_cpu)."""
    C, M, E, R, B, A, B_link = draw(linked_instances(matrix=matrix))
    N = len(C)
    of = draw(st.lists(st.integers(0, N - 1), min_size=N, max_size=N))
    C, M, B = ([values[k] for k in of] for values in (C, M, B))
    cpu = draw(link_cpus(N))
    if draw(st.booleans()):
        cpu = tuple([values[k] for k in of] for values in cpu)
    return C, M, E, R, B, A, B_link, cpu


def as_config(C, M, E, R, B=None, A=None, B_link=None, cuts=None, link_cpu=None) -> dict:
    config: dict = {"device_config": {"N": len(C), "C": list(C), "M": list(M)},
                    "model_config": {"U": len(E), "E": list(E), "R": list(R)}}
    for section, key, value in (("device_config", "B", B), ("model_config", "A", A),
                                ("device_config", "B_link", B_link), ("model_config", "cuts", cuts)):
        if value is not None:
            config[section][key] = list(value)
    if link_cpu is not None:
        config["device_config"]["link_cpu"] = dict(zip(("send_ms_per_mb", "receive_ms_per_mb", "frame_ms"),
                                                       map(list, link_cpu)))
    return config


@st.composite
def fleets(draw, max_types: int = 4, max_devices: int = 40, max_units: int = 16):
    """Many devices of a few kinds, the kinds' ids interleaved at random, memory often binding: (C, M, E, R).
    Integer unit times and sizes keep every sum exact (see tests/typecount.py)."""
    U = draw(st.integers(1, max_units))
    E = draw(st.lists(st.integers(0, 20).map(float), min_size=U, max_size=U))
    R = draw(st.lists(st.integers(0, 10).map(float), min_size=U, max_size=U))
    kinds = draw(st.lists(st.tuples(SPEEDS, st.integers(0, max(1, int(sum(R)) // 2)).map(float)),
                          min_size=1, max_size=max_types))
    N = draw(st.integers(1, max_devices))
    of = draw(st.lists(st.integers(0, len(kinds) - 1), min_size=N, max_size=N))
    return [kinds[k][0] for k in of], [kinds[k][1] for k in of], E, R
