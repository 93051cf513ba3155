"""Reading inputs and writing outputs, with clear errors and no partial outputs.

- :mod:`.inputs`: source NIfTI files and datalists, checked before any network runs (one line per problem).
- :mod:`.translations`: the translated images and their datalist.
- :mod:`.outputs`: a run's output folder, checked before any work, staged and published whole.
- :mod:`.publishing`: the one home for folders the bundle writes (marker, replace rule, staging, SIGTERM).
- :mod:`.atomic`: atomic file writes.
"""

from scripts.io import publishing
from scripts.io.atomic import write_bytes_atomic, write_text_atomic, write_torch_atomic
from scripts.io.inputs import (
    InputError,
    exit_on_bad_input,
    is_nifti,
    nifti_stem,
    output_stems,
    source_datalist,
    validate_nifti,
)
from scripts.io.outputs import OUTPUTS, PublishOutputs, check_output_dir
from scripts.io.translations import SaveTranslationd, TranslatedDatalistWriter

__all__ = [
    "OUTPUTS",
    "InputError",
    "PublishOutputs",
    "SaveTranslationd",
    "TranslatedDatalistWriter",
    "check_output_dir",
    "exit_on_bad_input",
    "is_nifti",
    "nifti_stem",
    "output_stems",
    "publishing",
    "source_datalist",
    "validate_nifti",
    "write_bytes_atomic",
    "write_text_atomic",
    "write_torch_atomic",
]
