"""Teacher formats (a registry) and the frozen teacher pool."""

from dmm.teachers.formats import list_formats, load_teacher_unet, register_format
from dmm.teachers.pool import Teacher, check_teacher_paths, check_teacher_shape, load_teacher

__all__ = ["Teacher", "check_teacher_paths", "check_teacher_shape", "list_formats", "load_teacher",
           "load_teacher_unet", "register_format"]
