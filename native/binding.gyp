{
  "variables": { "cuda%": "0", "cuda_home%": "/usr/local/cuda" },
  "targets": [
    {
      "target_name": "freekv",
      "sources": [ "<!@(node list-sources.mjs)" ],
      "include_dirs": [ "<!(node -p \"require('node-addon-api').include_dir\")", "src" ],
      "defines": [ "NAPI_VERSION=8", "NAPI_DISABLE_CPP_EXCEPTIONS_NOT", "NODE_ADDON_API_DISABLE_DEPRECATED" ],
      "cflags!": [ "-fno-exceptions" ],
      "cflags_cc!": [ "-fno-exceptions", "-fno-rtti" ],
      "cflags_cc": [ "-std=c++17", "-O3", "-march=x86-64-v2", "-fexceptions", "-fopenmp", "-Wall", "-Wno-unused-parameter" ],
      "ldflags": [ "-fopenmp" ],
      "libraries": [ "-lrt", "-ldl", "-lpthread" ],
      "conditions": [
        [ "cuda==1", {
          "defines": [ "FREEKV_WITH_CUDA=1" ],
          "include_dirs": [ "<(cuda_home)/include" ],
          "libraries": [ "<(module_root_dir)/build/cuda/libfreekv_cuda.a", "<(cuda_home)/lib64/libcudart_static.a" ]
        } ]
      ]
    }
  ]
}
