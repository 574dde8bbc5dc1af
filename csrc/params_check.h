// The Python functions of fastavg._C (params_check.cpp), for its module definition (register.cpp).
#pragma once
#include <Python.h>

namespace fastavg {
extern PyMethodDef kPythonMethods[];
}
