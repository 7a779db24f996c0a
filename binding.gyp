{
  "targets": [
    {
      "target_name": "duet_native",
      "sources": ["native/duet_native.c"],
      "cflags": ["-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-O2"]
    }
  ]
}
