"""Teacher pools ("model zoos"): build them in parallel, describe them in a manifest, load them safely."""
from .build import POLICIES, ZooConfig, build_zoo, default_zoo_dir, plan_classes, train_teacher
from .manifest import TeacherRecord, load_teacher, load_teacher_state, read_manifest, write_manifest
from .timing import BuildTimes, TeacherTimes

__all__ = ["POLICIES", "ZooConfig", "build_zoo", "default_zoo_dir", "plan_classes", "train_teacher",
           "TeacherRecord", "load_teacher", "load_teacher_state", "read_manifest", "write_manifest",
           "BuildTimes", "TeacherTimes"]
