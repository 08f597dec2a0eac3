"""The paper's definitions that the tests check the code against, written out here and never read
from the code under test."""


def paper_range(bits: int, signed: bool) -> tuple[int, int]:
    """LSQ's (Qn, Qp) for b bits: signed 2^(b-1) and 2^(b-1) - 1, unsigned 0 and 2^b - 1."""
    if signed:
        return 2 ** (bits - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1
