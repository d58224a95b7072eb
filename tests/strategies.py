"""Hypothesis strategies for small planning instances, with memory that often binds."""

from hypothesis import strategies as st

# Speeds and sizes on a coarse grid keep sums exact, so the oracle and the planners compare
# exactly; the real profile test covers arbitrary floats.
SPEEDS = st.sampled_from([1.0, 0.5, 0.25, 0.33, 0.21, 2.0])


@st.composite
def instances(draw, max_devices: int = 4, max_units: int = 8):
    N = draw(st.integers(1, max_devices))
    U = draw(st.integers(1, max_units))
    E = draw(st.lists(st.integers(0, 20).map(float), min_size=U, max_size=U))
    R = draw(st.lists(st.integers(0, 10).map(float), min_size=U, max_size=U))
    C = draw(st.lists(SPEEDS, min_size=N, max_size=N))
    # Capacities around total/N make memory bind often and make some instances infeasible.
    top = max(1, int(sum(R)))
    M = draw(st.lists(st.integers(0, top).map(float), min_size=N, max_size=N))
    return C, M, E, R


def as_config(C, M, E, R) -> dict:
    return {"device_config": {"N": len(C), "C": list(C), "M": list(M)},
            "model_config": {"U": len(E), "E": list(E), "R": list(R)}}
