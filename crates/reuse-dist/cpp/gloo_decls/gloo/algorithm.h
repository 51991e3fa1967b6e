// Declarations only: the torch wheel ships libtorch_cpu with Gloo compiled in but not
// Gloo's headers. ProcessGroupGloo.hpp needs these names to compile; every object of
// these types is created and used inside libtorch_cpu, never by reuse's shim.
#pragma once
#include "gloo/context.h"
