"""Runtime: Ray start-up, TeacherPool / MetaLearner roles and the driver's round loop."""
