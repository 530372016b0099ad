// Python spellings of dtypes ("torch.float16", not "Half") for error messages, and the float
// dtypes the fused kernels take.
#pragma once

#include <c10/core/ScalarType.h>

#include <string>

namespace toyllm {

inline std::string dtype_name(c10::ScalarType t) {
    switch (t) {
        case c10::kFloat:
            return "torch.float32";
        case c10::kHalf:
            return "torch.float16";
        case c10::kBFloat16:
            return "torch.bfloat16";
        case c10::kDouble:
            return "torch.float64";
        case c10::kInt:
            return "torch.int32";
        case c10::kLong:
            return "torch.int64";
        case c10::kShort:
            return "torch.int16";
        case c10::kChar:
            return "torch.int8";
        case c10::kByte:
            return "torch.uint8";
        case c10::kBool:
            return "torch.bool";
        default:
            return std::string("torch.") + c10::toString(t);
    }
}

// fp32, fp16 or bf16: the dtypes every float kernel takes (check_float_dtype, op_args.h).
inline bool is_supported_dtype(c10::ScalarType t) {
    return t == c10::kFloat || t == c10::kHalf || t == c10::kBFloat16;
}

}  // namespace toyllm
