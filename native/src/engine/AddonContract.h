// The contract the tiers share, as the JS binding sees it (AddonContract.cpp): argument parsing
// of geometry and retrieval settings (errors name the field), and the contract functions
// (layout, manifest, retrieval defaults, validator, enum names) that both addons export.
#pragma once

#include <napi.h>

#include <string>

#include "engine/Layout.h"
#include "engine/Retrieval.h"

namespace freekv::addon {

Napi::Object ObjectArg(const Napi::Env& env, Napi::Value v, const std::string& name);
// `present` null: the field is required; otherwise it reports whether the field was given.
double NumberField(const Napi::Object& o, const char* key, const std::string& path, bool* present = nullptr);
int IntField(const Napi::Object& o, const char* key, const std::string& path, int lo, int hi, bool optional = false,
             int dflt = 0);
bool BoolField(const Napi::Object& o, const char* key, const std::string& path, bool dflt);
int IntArg(const Napi::CallbackInfo& info, size_t i, const std::string& name, int lo = 0, int hi = 1 << 30);

Geometry ParseGeometry(const Napi::Env& env, Napi::Value v);
// The fields' types only: a field left out takes the RetrievalConfig default; values are checked
// by ValidateRetrieval.
RetrievalConfig ParseRetrieval(const Napi::Env& env, Napi::Value v);
// ParseRetrieval, then ValidateRetrieval; a RangeError "retrieval.<field> <message>" when invalid.
RetrievalConfig ParseValidRetrieval(const Napi::Env& env, Napi::Value v, int layers);

// layout, initManifest, readManifest, retrievalDefaults, validateRetrieval, enums.
void InitContract(Napi::Env env, Napi::Object exports);

}  // namespace freekv::addon
