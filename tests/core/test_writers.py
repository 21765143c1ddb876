"""What the writers refuse to store: statistics the checkpoint's own dtype cannot hold."""

import numpy as np
import pytest

from bnrepair.errors import InputError
from bnrepair.writers import storable


def test_statistics_are_stored_in_the_checkpoint_dtype_or_refused():
    assert storable([1.5, 2.0], np.float16, "m.h5: bn/moving_variance").dtype == np.float16
    with pytest.raises(InputError, match=r"m.h5: bn/moving_variance: .*largest \|value\| 1e\+06.* overflow its "
                                         r"stored float16"):
        storable([1e6, 2.0], np.float16, "m.h5: bn/moving_variance")
    for dtype in (np.int32, np.uint8, np.bool_, np.complex64):
        with pytest.raises(InputError, match=f"is stored as {np.dtype(dtype)}, which cannot hold BN statistics"):
            storable([1.0], dtype, "m.h5: bn/moving_mean")
