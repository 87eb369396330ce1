// Compiles the precompiled header (utils/pch.h) once for all targets.
