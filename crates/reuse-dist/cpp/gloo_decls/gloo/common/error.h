// Declarations only (see gloo/algorithm.h).
#pragma once
