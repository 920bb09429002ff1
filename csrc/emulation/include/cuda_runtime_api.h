// Emulation build: everything CUDA provides comes from the force-included cuda_emulation.h.
#pragma once
#include "../cuda_emulation.h"
