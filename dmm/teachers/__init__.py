"""Teacher formats (a registry) and the frozen teacher pool."""

from dmm.teachers.formats import (
    TEACHER_FORMATS,
    TeacherFileError,
    list_formats,
    load_teacher_unet,
    register_format,
)
from dmm.teachers.pool import (
    Teacher,
    TeacherLoadError,
    check_teacher_paths,
    check_teacher_shape,
    load_teacher,
)

__all__ = ["TEACHER_FORMATS", "Teacher", "TeacherFileError", "TeacherLoadError", "check_teacher_paths",
           "check_teacher_shape", "list_formats", "load_teacher", "load_teacher_unet", "register_format"]
