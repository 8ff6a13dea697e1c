"""Teacher formats (a registry) and the frozen teacher pool."""

from dmm.teachers.formats import (
    TEACHER_FORMATS,
    TeacherFileError,
    TeacherParts,
    list_formats,
    load_teacher_parts,
    load_teacher_unet,
    register_format,
)
from dmm.teachers.lora import fuse_lora_teacher  # registers the `lora` format
from dmm.teachers.pool import (
    Teacher,
    TeacherLoadError,
    check_teacher_paths,
    check_teacher_shape,
    load_teacher,
)

__all__ = ["TEACHER_FORMATS", "Teacher", "TeacherFileError", "TeacherLoadError", "TeacherParts", "check_teacher_paths",
           "check_teacher_shape", "fuse_lora_teacher", "list_formats", "load_teacher", "load_teacher_parts", "load_teacher_unet",
           "register_format"]
