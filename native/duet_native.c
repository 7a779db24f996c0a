/*
 * duet_native: the few Linux syscalls Node does not expose, for the block
 * layer (hole punching, zeroing, SEEK_DATA/SEEK_HOLE, flock, block-device
 * size and discard). Plain N-API (node_api.h), no dependencies.
 *
 * Every function is synchronous and takes a numeric fd. Offsets and lengths
 * are JS numbers that must be non-negative safe integers. Failures throw an
 * Error with .code = errno name (e.g. 'EOPNOTSUPP'), .errno = the positive
 * errno number and .syscall = the failing call.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#ifndef NAPI_VERSION
#define NAPI_VERSION 8
#endif

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <node_api.h>

#define MAX_SAFE_INTEGER 9007199254740991.0

/* ---------- errors ---------- */

static const char *errno_name(int err) {
  switch (err) {
    case EPERM: return "EPERM";
    case ENOENT: return "ENOENT";
    case EINTR: return "EINTR";
    case EIO: return "EIO";
    case ENXIO: return "ENXIO";
    case EBADF: return "EBADF";
    case EAGAIN: return "EAGAIN"; /* == EWOULDBLOCK on Linux */
    case ENOMEM: return "ENOMEM";
    case EACCES: return "EACCES";
    case EFAULT: return "EFAULT";
    case EBUSY: return "EBUSY";
    case ENODEV: return "ENODEV";
    case EISDIR: return "EISDIR";
    case EINVAL: return "EINVAL";
    case EFBIG: return "EFBIG";
    case ENOSPC: return "ENOSPC";
    case ESPIPE: return "ESPIPE";
    case EROFS: return "EROFS";
    case ENOTTY: return "ENOTTY";
    case ENOSYS: return "ENOSYS";
    case ENOLCK: return "ENOLCK";
    case EOPNOTSUPP: return "EOPNOTSUPP"; /* == ENOTSUP on Linux */
    case ETXTBSY: return "ETXTBSY";
    case EOVERFLOW: return "EOVERFLOW";
    case EDQUOT: return "EDQUOT";
    default: break;
  }
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 32))
  {
    const char *n = strerrorname_np(err);
    if (n != NULL) return n;
  }
#endif
  return "EUNKNOWN";
}

/* Throws Error{code, errno, syscall}. `code` overrides the errno name. */
static void throw_errno(napi_env env, int err, const char *syscall, const char *code) {
  char msg[256];
  if (code == NULL) code = errno_name(err);
  snprintf(msg, sizeof msg, "%s: %s failed: %s", code, syscall, strerror(err));

  napi_value js_msg, js_code, js_errno, js_syscall, error;
  if (napi_create_string_utf8(env, msg, NAPI_AUTO_LENGTH, &js_msg) != napi_ok ||
      napi_create_string_utf8(env, code, NAPI_AUTO_LENGTH, &js_code) != napi_ok ||
      napi_create_int32(env, err, &js_errno) != napi_ok ||
      napi_create_string_utf8(env, syscall, NAPI_AUTO_LENGTH, &js_syscall) != napi_ok ||
      napi_create_error(env, js_code, js_msg, &error) != napi_ok) {
    napi_throw_error(env, code, msg);
    return;
  }
  napi_set_named_property(env, error, "errno", js_errno);
  napi_set_named_property(env, error, "syscall", js_syscall);
  napi_throw(env, error);
}

static void throw_arg(napi_env env, const char *name, const char *what) {
  char msg[160];
  snprintf(msg, sizeof msg, "The \"%s\" argument must be %s", name, what);
  napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", msg);
}

/* ---------- argument helpers (return 0 and throw on failure) ---------- */

#define MAX_ARGS 4

static int get_args(napi_env env, napi_callback_info info, size_t want, napi_value *argv) {
  size_t argc = MAX_ARGS;
  napi_value tmp[MAX_ARGS];
  if (napi_get_cb_info(env, info, &argc, tmp, NULL, NULL) != napi_ok) {
    napi_throw_error(env, NULL, "napi_get_cb_info failed");
    return 0;
  }
  if (argc < want) {
    char msg[96];
    snprintf(msg, sizeof msg, "expected %zu arguments, got %zu", want, argc);
    napi_throw_type_error(env, "ERR_MISSING_ARGS", msg);
    return 0;
  }
  for (size_t i = 0; i < want; i++) argv[i] = tmp[i];
  return 1;
}

static int get_fd(napi_env env, napi_value v, int *out) {
  napi_valuetype t;
  double d;
  if (napi_typeof(env, v, &t) != napi_ok || t != napi_number ||
      napi_get_value_double(env, v, &d) != napi_ok || d != floor(d) || d < 0 || d > 2147483647.0) {
    throw_arg(env, "fd", "a non-negative int32");
    return 0;
  }
  *out = (int)d;
  return 1;
}

static int get_u64(napi_env env, napi_value v, const char *name, int64_t *out) {
  napi_valuetype t;
  double d;
  if (napi_typeof(env, v, &t) != napi_ok || t != napi_number ||
      napi_get_value_double(env, v, &d) != napi_ok || !isfinite(d) || d != floor(d) || d < 0 ||
      d > MAX_SAFE_INTEGER) {
    throw_arg(env, name, "a non-negative safe integer");
    return 0;
  }
  if (napi_get_value_int64(env, v, out) != napi_ok) {
    throw_arg(env, name, "a non-negative safe integer");
    return 0;
  }
  return 1;
}

static int get_bool(napi_env env, napi_value v, const char *name, int *out) {
  bool b;
  if (napi_get_value_bool(env, v, &b) != napi_ok) {
    throw_arg(env, name, "a boolean");
    return 0;
  }
  *out = b ? 1 : 0;
  return 1;
}

static napi_value undefined(napi_env env) {
  napi_value u;
  napi_get_undefined(env, &u);
  return u;
}

static napi_value number(napi_env env, int64_t n) {
  napi_value v;
  napi_create_int64(env, n, &v);
  return v;
}

/* ---------- fallocate ---------- */

static napi_value do_fallocate(napi_env env, napi_callback_info info, int mode, const char *syscall) {
  napi_value argv[3];
  int fd;
  int64_t offset, length;
  if (!get_args(env, info, 3, argv) || !get_fd(env, argv[0], &fd) ||
      !get_u64(env, argv[1], "offset", &offset) || !get_u64(env, argv[2], "length", &length)) {
    return NULL;
  }
  if (length == 0) return undefined(env); /* fallocate rejects len 0 with EINVAL */
  int r;
  do {
    r = fallocate(fd, mode, (off_t)offset, (off_t)length);
  } while (r < 0 && errno == EINTR);
  if (r < 0) throw_errno(env, errno, syscall, NULL);
  return undefined(env);
}

static napi_value PunchHole(napi_env env, napi_callback_info info) {
  return do_fallocate(env, info, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, "fallocate(PUNCH_HOLE)");
}

static napi_value ZeroRange(napi_env env, napi_callback_info info) {
  return do_fallocate(env, info, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, "fallocate(ZERO_RANGE)");
}

/* ---------- lseek SEEK_DATA / SEEK_HOLE ---------- */

static napi_value do_seek(napi_env env, napi_callback_info info, int whence, const char *syscall) {
  napi_value argv[2];
  int fd;
  int64_t offset;
  if (!get_args(env, info, 2, argv) || !get_fd(env, argv[0], &fd) ||
      !get_u64(env, argv[1], "offset", &offset)) {
    return NULL;
  }
  off_t r = lseek(fd, (off_t)offset, whence);
  if (r < 0) {
    if (errno == ENXIO) return number(env, -1);
    throw_errno(env, errno, syscall, NULL);
    return NULL;
  }
  return number(env, (int64_t)r);
}

static napi_value SeekData(napi_env env, napi_callback_info info) {
  return do_seek(env, info, SEEK_DATA, "lseek(SEEK_DATA)");
}

static napi_value SeekHole(napi_env env, napi_callback_info info) {
  return do_seek(env, info, SEEK_HOLE, "lseek(SEEK_HOLE)");
}

/* ---------- flock ---------- */

static napi_value Flock(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int fd, exclusive, nonblocking;
  if (!get_args(env, info, 3, argv) || !get_fd(env, argv[0], &fd) ||
      !get_bool(env, argv[1], "exclusive", &exclusive) ||
      !get_bool(env, argv[2], "nonBlocking", &nonblocking)) {
    return NULL;
  }
  int op = (exclusive ? LOCK_EX : LOCK_SH) | (nonblocking ? LOCK_NB : 0);
  int r;
  do {
    r = flock(fd, op);
  } while (r < 0 && errno == EINTR);
  if (r < 0) {
    int err = errno;
    /* flock(2) documents the conflict as EWOULDBLOCK (same value as EAGAIN). */
    throw_errno(env, err, "flock", err == EWOULDBLOCK ? "EWOULDBLOCK" : NULL);
  }
  return undefined(env);
}

static napi_value Funlock(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int fd;
  if (!get_args(env, info, 1, argv) || !get_fd(env, argv[0], &fd)) return NULL;
  int r;
  do {
    r = flock(fd, LOCK_UN);
  } while (r < 0 && errno == EINTR);
  if (r < 0) throw_errno(env, errno, "flock(LOCK_UN)", NULL);
  return undefined(env);
}

/* ---------- block device ioctls ---------- */

static napi_value BlockDeviceSize(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int fd;
  if (!get_args(env, info, 1, argv) || !get_fd(env, argv[0], &fd)) return NULL;
  uint64_t size = 0;
  if (ioctl(fd, BLKGETSIZE64, &size) < 0) {
    throw_errno(env, errno, "ioctl(BLKGETSIZE64)", NULL);
    return NULL;
  }
  if ((double)size > MAX_SAFE_INTEGER) {
    throw_errno(env, EOVERFLOW, "ioctl(BLKGETSIZE64)", NULL);
    return NULL;
  }
  return number(env, (int64_t)size);
}

static napi_value Discard(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int fd;
  int64_t offset, length;
  if (!get_args(env, info, 3, argv) || !get_fd(env, argv[0], &fd) ||
      !get_u64(env, argv[1], "offset", &offset) || !get_u64(env, argv[2], "length", &length)) {
    return NULL;
  }
  if (length == 0) return undefined(env);
  uint64_t range[2] = {(uint64_t)offset, (uint64_t)length};
  if (ioctl(fd, BLKDISCARD, range) < 0) throw_errno(env, errno, "ioctl(BLKDISCARD)", NULL);
  return undefined(env);
}

/* ---------- descriptors ---------- */

/* dup with close-on-exec: hands an accepted socket to another thread's event
 * loop, which then owns the new descriptor alone. */
static napi_value Dup(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int fd;
  if (!get_args(env, info, 1, argv) || !get_fd(env, argv[0], &fd)) return NULL;
  int r = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (r < 0) {
    throw_errno(env, errno, "fcntl(F_DUPFD_CLOEXEC)", NULL);
    return NULL;
  }
  return number(env, r);
}

/* ---------- module ---------- */

static napi_value Init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"punchHole", NULL, PunchHole, NULL, NULL, NULL, napi_enumerable, NULL},
      {"zeroRange", NULL, ZeroRange, NULL, NULL, NULL, napi_enumerable, NULL},
      {"seekData", NULL, SeekData, NULL, NULL, NULL, napi_enumerable, NULL},
      {"seekHole", NULL, SeekHole, NULL, NULL, NULL, napi_enumerable, NULL},
      {"flock", NULL, Flock, NULL, NULL, NULL, napi_enumerable, NULL},
      {"funlock", NULL, Funlock, NULL, NULL, NULL, napi_enumerable, NULL},
      {"blockDeviceSize", NULL, BlockDeviceSize, NULL, NULL, NULL, napi_enumerable, NULL},
      {"discard", NULL, Discard, NULL, NULL, NULL, napi_enumerable, NULL},
      {"dup", NULL, Dup, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  if (napi_define_properties(env, exports, sizeof props / sizeof props[0], props) != napi_ok) {
    napi_throw_error(env, NULL, "duet_native: napi_define_properties failed");
    return NULL;
  }
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, Init)
