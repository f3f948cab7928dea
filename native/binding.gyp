{
  "variables": { "cuda%": "0", "cuda_home%": "/usr/local/cuda" },
  "target_defaults": {
    "include_dirs": [ "<!(node -p \"require('node-addon-api').include_dir\")", "src" ],
    "defines": [ "NAPI_VERSION=8", "NODE_ADDON_API_DISABLE_DEPRECATED" ],
    "cflags!": [ "-fno-exceptions" ],
    "cflags_cc!": [ "-fno-exceptions", "-fno-rtti" ],
    "cflags_cc": [ "-std=c++17", "-O3", "-march=x86-64-v2", "-fexceptions", "-Wall", "-Wno-unused-parameter" ],
    "libraries": [ "-lrt" ]
  },
  "targets": [
    {
      "target_name": "freekv",
      "sources": [ "<!@(node list-sources.mjs)" ],
      "cflags_cc": [ "-fopenmp" ],
      "ldflags": [ "-fopenmp" ],
      "libraries": [ "-ldl", "-lpthread" ],
      "conditions": [
        [ "cuda==1", {
          "defines": [ "FREEKV_WITH_CUDA=1" ],
          "include_dirs": [ "<(cuda_home)/include" ],
          "libraries": [ "<(module_root_dir)/build/cuda/libfreekv_cuda.a", "<(cuda_home)/lib64/libcudart_static.a" ]
        } ]
      ]
    },
    {
      "target_name": "freekv_shm",
      "sources": [ "<!@(node list-sources.mjs shm)" ]
    }
  ]
}
