// Emulation build: the cub twins come with the force-included cuda_emulation.h.
#pragma once
#include "../../../cuda_emulation.h"
